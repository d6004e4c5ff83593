-- The MLflow tracking server keeps its runs and registry in a database of its own.
CREATE ROLE mlflow LOGIN PASSWORD 'mlflow-dev';
CREATE DATABASE mlflow OWNER mlflow;
