"""eagle-pipe against its peers (Model-Optimizer, speculators): step time at equal shapes, draft quality at equal budget."""
