"""Ray actors: the clients and the coordinator of the three-stage schedule, MLflow logging."""
