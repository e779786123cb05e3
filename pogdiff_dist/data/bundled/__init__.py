"""The bundled datasets (Digits-IT2I, Faces-IT2I)."""
