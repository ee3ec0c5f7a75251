"""Prefect flows of instructflow: wiring only; the logic lives in `tasks`."""
