"""Fault injection with real processes: kill -9, broker restarts and outages, backlogs."""
