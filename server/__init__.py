"""fedllama's Flower ServerApp."""
