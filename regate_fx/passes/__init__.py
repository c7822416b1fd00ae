"""Graph passes: capture -> analyse -> rewrite -> compile."""
