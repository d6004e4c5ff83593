"""Features defined once in SQL and computed by one incremental operator (README: Features in SQL).

`sql` parses the supported subset (sqlglot) into a `plan.FeaturePlan`; `operator` computes it event
by event with per-key state, the same code in training replay, previews and scorers. Pure Python:
no database, no Kafka client (the import contract "features imports no domain and no database").
"""
