"""Item text in and vectors out: reading catalogs and events, the language model, embedding checks."""
