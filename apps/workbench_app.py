"""The workbench's browser app: `wb app` (or `streamlit run apps/workbench_app.py`).

The sidebar chooses the model and the folder runs are looked up in; the pages are files beside this one:
the image explorer, layers, runs and export. Every page keeps working when a model fails to load.
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from apps import state

HERE = Path(__file__).parent

st.set_page_config(page_title="Multimodal workbench", layout="wide")
pages = st.navigation([
    st.Page(HERE / "explorer.py", title="Image explorer", default=True),
    st.Page(HERE / "layers_page.py", title="Layers", url_path="layers"),
    st.Page(HERE / "runs_page.py", title="Runs", url_path="runs"),
    st.Page(HERE / "export_page.py", title="Export", url_path="export"),
])
st.sidebar.title("Multimodal workbench")
state.model_sidebar()
st.sidebar.text_input("Run root", value=os.environ.get("WB_RUNS_DIR", "runs"), key=state.RUNS_ROOT_KEY,
                      help="folder searched for run folders (those with a manifest.json)")
pages.run()
