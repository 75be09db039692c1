"""certmon agent: the device-side program (collect, sign, publish, spool). Imports certmon only."""
