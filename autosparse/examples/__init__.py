"""Small, importable examples for configs in search_spaces/ (e.g. a custom data loader)."""
