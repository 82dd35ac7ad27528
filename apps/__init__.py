"""The Streamlit app: explore visual-token categories, layers and runs; export configs."""
