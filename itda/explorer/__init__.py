"""Look inside a dictionary: atom usage on held-out tokens (usage), the explorer's data (data),
its static page (page), and views computed on a model (run)."""
