"""Measures of the synthetic images themselves: fidelity, diversity and memorization."""
