"""Pure tensor maths shared by the methods."""
