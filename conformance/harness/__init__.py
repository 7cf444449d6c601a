"""Test harness: the suite playing the daemon (to test clients) or the client (to test daemons)."""
