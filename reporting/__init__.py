"""Reports of a guided run (SPELL activity, nearest shields) and the charts drawn from them; host-free."""
