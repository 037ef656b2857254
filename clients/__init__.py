"""fedllama's Flower ClientApp."""
