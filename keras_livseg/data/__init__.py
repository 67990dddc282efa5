"""data stage of keras_livseg."""
