"""Persistent state: stored responses, their input items, background jobs, and files."""
