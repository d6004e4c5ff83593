"""Training: the Celery worker, trainers per algorithm family, evaluation, MLflow registration."""
