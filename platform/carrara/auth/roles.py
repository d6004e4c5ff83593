"""Roles, from least to most privileged: each role can do everything the ones before it can."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    viewer = "viewer"  # read everything
    editor = "editor"  # + datasets, runs, models, deployments
    admin = "admin"  # + tokens

    def allows(self, required: Role) -> bool:
        order = list(Role)
        return order.index(self) >= order.index(required)
