"""The live `docker compose up`: a real Docker engine, images built here."""
