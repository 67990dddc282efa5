"""evaluation stage of keras_livseg."""
