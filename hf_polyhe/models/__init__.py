"""The three model families."""
