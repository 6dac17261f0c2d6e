"""The multi-worker demo: a small MLP trained on scikit-learn's digits through the server."""
