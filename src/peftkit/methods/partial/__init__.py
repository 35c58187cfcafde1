"""Partial PEFT methods."""
