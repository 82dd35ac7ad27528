"""The workbench's browser app: `wb app` (or `streamlit run apps/workbench_app.py`).

The sidebar chooses the model and names the run root (the server's setting, see `apps.run_root`); the pages
are files beside this one: the image explorer, layers, runs and export. Every page keeps working when a
model fails to load.
"""

from pathlib import Path

import streamlit as st

HERE = Path(__file__).parent

st.set_page_config(page_title="Multimodal workbench", layout="wide")
# A cold start spends seconds importing torch and transformers and loading the model before any page can
# draw: say so first, instead of a blank page.
starting = st.empty()
starting.info("Starting the workbench: loading its libraries and the model ...")

from apps import state  # noqa: E402 - the slow import, after the note above

pages = st.navigation([
    st.Page(HERE / "explorer.py", title="Image explorer", default=True),
    st.Page(HERE / "layers_page.py", title="Layers", url_path="layers"),
    st.Page(HERE / "runs_page.py", title="Runs", url_path="runs"),
    st.Page(HERE / "export_page.py", title="Export", url_path="export"),
])
st.sidebar.title("Multimodal workbench")
state.model_sidebar()
st.sidebar.caption(f"Run root `{state.runs_root()}`: runs are listed from and written under it "
                   f"(`wb app --runs-dir` sets it)")
starting.empty()
pages.run()
