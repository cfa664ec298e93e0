"""Neuronpedia: which feature page an objective is (`ids`), and dreams and top dataset examples written in
Neuronpedia's export layout (`export`). Nothing here reaches the network."""
