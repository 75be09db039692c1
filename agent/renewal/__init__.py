"""Client certificate renewal on the device (docs/renewal.md): policy (when), hook
(how the new pair is obtained), proof (is it good), install (atomic swap) and
attempt (one attempt end to end, and its recorded state)."""
