"""Model building, training, evaluation and export (uses torch; never imported by serving code)."""
