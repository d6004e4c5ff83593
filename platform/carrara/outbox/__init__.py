"""Transactional outbox: announce changes to Kafka and Celery only once they are committed."""
