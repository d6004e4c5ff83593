"""Kafka I/O shared by every component; knows Kafka and nothing of the domains or the database."""
