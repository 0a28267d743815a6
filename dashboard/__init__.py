"""The Gradio dashboard: renders traces from ``model``; no tensor maths here."""
