"""Conversion of weights from other frameworks' layouts into Flax variable trees."""
