"""The e2e suite reuses the gateway's data fixtures: the recorded data loaded into PostgreSQL."""

from tests.integration.gateway.conftest import dataset, db_url, loaded_data

__all__ = ["dataset", "db_url", "loaded_data"]
