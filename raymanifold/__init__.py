"""raymanifold."""
