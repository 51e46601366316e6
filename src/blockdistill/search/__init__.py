"""The block search: the candidate space, the block library trained from one teacher
pass, its scores, and the exact solver that assembles a student under a budget."""
