"""certmon collector: verify, store, evaluate, alert, scan, serve. Imports certmon only."""
