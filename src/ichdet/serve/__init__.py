"""The DICOM node (``ichdet serve``): receive studies over the network, analyse each completed study,
send the results back. See the README section "DICOM node" and deploy/serve.yaml."""

from __future__ import annotations

from ichdet.serve.analysis import Analyser, AnalysisResult, analyse_study, bundle_analyser
from ichdet.serve.config import Destination, ServeConfig, load_serve_config, parse_destination
from ichdet.serve.node import Node, run_node
from ichdet.serve.spool import Spool, StudyState, study_key
from ichdet.serve.status import spool_status

__all__ = [
           "Analyser",
           "AnalysisResult",
           "Destination",
           "Node",
           "ServeConfig",
           "Spool",
           "StudyState",
           "analyse_study",
           "bundle_analyser",
           "load_serve_config",
           "parse_destination",
           "run_node",
           "spool_status",
           "study_key",
]
