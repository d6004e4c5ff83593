"""SQLAlchemy 2 typed models; importing this package registers every table on `Base.metadata`."""

from carrara.models.base import Base
from carrara.models.datasets import Dataset, DatasetVersion

__all__ = ["Base", "Dataset", "DatasetVersion"]
