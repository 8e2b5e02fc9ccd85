"""The in-memory state (items, users, co-clicks, lexicon) and the one path every logged mutation takes into it."""
