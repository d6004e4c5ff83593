"""The no-Docker local stack: PostgreSQL, Redis, Apache Kafka (KRaft) and MLflow as child processes.

Every service keeps its data and log under `Settings.home` (default `./.carrara`) and is tracked
by a PID file, so `carrara stack down` stops exactly the processes this project started.
"""
