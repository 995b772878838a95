"""The ensemble as one ONNX graph: the three converted tree ensembles and the weighted vote on P(up).

Converters: LightGBM and XGBoost through onnxmltools, the RandomForest through skl2onnx. Each gives
a TreeEnsembleClassifier node (ai.onnx.ml opset 3) whose second output holds P(class 0), P(class 1);
only those nodes are kept, wired to one input and followed by the vote:

    features (float64, n x 12) -> LightGBM trees ---------------------------+
                               -> Cast float32 -> XGBoost trees ------------+-> Concat -> MatMul(weights) -> p_up (n)
                                               -> RandomForest trees -------+

Why each model reads the input it does: each graph compares a feature with a threshold exactly as its
library does, so decisions agree row for row, not only on average.

* XGBoost and scikit-learn trees compare float32 features (both libraries cast the input), so their
  nodes read the float32 cast; skl2onnx already rounds sklearn's float64 thresholds so that the float32
  comparison gives sklearn's answer.
* LightGBM compares float64 features with float64 thresholds, but onnxmltools stores float32
  thresholds and accepts only float32 input: on the pipeline's holdout that flipped a split for about
  one row in 17,000 (P(up) off by 1e-3, beyond the 1e-5 parity bound). The LightGBM node therefore
  reads the float64 input and gets the booster's exact float64 thresholds (`nodes_values_as_tensor`),
  matched to the converted nodes by walking both trees together.

Leaf values and the vote are float32, so P(up) differs from the native float64 sum by about 1e-7.
The bytes depend only on the models: names are fixed, nothing records a time or a random id.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import lightgbm
import numpy as np
import onnx
import xgboost
from onnx import TensorProto, helper, numpy_helper
from onnxmltools import convert_lightgbm, convert_xgboost
from onnxmltools.convert.common.data_types import FloatTensorType as ConverterFloatTensor
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import RandomForestClassifier

from cryptoml.serving import INPUT_NAME, OUTPUT_NAME

# Versions onnxruntime has run tree ensembles with since 1.15 (IR 9, opset 17; ai.onnx.ml 3 for float64 thresholds).
IR_VERSION = 9
OPSETS = {"": 17, "ai.onnx.ml": 3}
# The highest opset the onnxmltools converters accept; only their TreeEnsembleClassifier node is kept.
_CONVERTER_OPSET = 15
_TREE_OP = "TreeEnsembleClassifier"
_FLOAT_INPUT = "features_float32"
_PROBABILITY_COLUMNS = 2  # P(class 0), P(class 1) per model


class ExportError(RuntimeError):
    """A converter gave a graph this exporter does not recognise; nothing was written."""


def export_onnx(
    lightgbm_booster: lightgbm.Booster,
    xgboost_booster: xgboost.Booster,
    forest: RandomForestClassifier,
    weights: Mapping[str, float],
    feature_names: list[str],
) -> bytes:
    """Serialised ONNX model: input `features` (float64, n x len(feature_names)), output `p_up` (float32, n).

    `weights` are the ensemble's normalised weights by model name (lightgbm, xgboost, random_forest).
    """
    n_features = len(feature_names)
    trees = {
        "lightgbm": (_lightgbm_node(lightgbm_booster, n_features), INPUT_NAME),
        "xgboost": (_xgboost_node(xgboost_booster, n_features), _FLOAT_INPUT),
        "random_forest": (_forest_node(forest, n_features), _FLOAT_INPUT),
    }
    nodes = [helper.make_node("Cast", [INPUT_NAME], [_FLOAT_INPUT], name="cast_float32", to=TensorProto.FLOAT)]
    for name, (node, input_name) in trees.items():
        nodes.append(_rewired(node, name, input_name))
    # The vote: P(up) is column 1 of each model's pair, so the weight matrix has zeros in the P(class 0) columns.
    vote = np.zeros(_PROBABILITY_COLUMNS * len(trees), dtype=np.float32)
    vote[1::_PROBABILITY_COLUMNS] = [weights[name] for name in trees]
    nodes += [
        helper.make_node("Concat", [f"{name}_probabilities" for name in trees], ["probabilities"], name="concat", axis=1),
        helper.make_node("MatMul", ["probabilities", "vote_weights"], [OUTPUT_NAME], name="vote"),
    ]
    graph = helper.make_graph(
        nodes,
        "cryptoml_ensemble",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.DOUBLE, ["rows", n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["rows"])],
        initializer=[numpy_helper.from_array(vote, "vote_weights")],
    )
    model = helper.make_model(
        graph,
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in OPSETS.items()],
        producer_name="cryptoml",
        doc_string=f"P(up) of the cryptoml ensemble; input columns in this order: {json.dumps(feature_names)}",
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _tree_node(model: onnx.ModelProto, source: str) -> onnx.NodeProto:
    found = [node for node in model.graph.node if node.op_type == _TREE_OP]
    if len(found) != 1:
        raise ExportError(f"{source} gave {len(found)} {_TREE_OP} nodes, expected exactly one: the converter changed")
    return found[0]


def _rewired(node: onnx.NodeProto, name: str, input_name: str) -> onnx.NodeProto:
    """The converter's node under fixed names, reading `input_name`."""
    rewired = onnx.NodeProto()
    rewired.CopyFrom(node)
    rewired.name = name
    rewired.domain = "ai.onnx.ml"
    del rewired.input[:]
    rewired.input.append(input_name)
    del rewired.output[:]
    rewired.output.extend([f"{name}_label", f"{name}_probabilities"])
    return rewired


def _converter_input(n_features: int) -> list[tuple[str, ConverterFloatTensor]]:
    return [(INPUT_NAME, ConverterFloatTensor([None, n_features]))]


def _lightgbm_node(booster: lightgbm.Booster, n_features: int) -> onnx.NodeProto:
    converted = convert_lightgbm(
        booster, name="lightgbm", initial_types=_converter_input(n_features), zipmap=False, target_opset=_CONVERTER_OPSET
    )
    node = _tree_node(converted, "onnxmltools (LightGBM)")
    exact = _exact_lightgbm_thresholds(node, booster.dump_model()["tree_info"])
    kept = [attribute for attribute in node.attribute if attribute.name != "nodes_values"]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute("nodes_values_as_tensor", numpy_helper.from_array(exact)))
    return node


def _exact_lightgbm_thresholds(node: onnx.NodeProto, trees: list[dict[str, Any]]) -> np.ndarray:
    """The booster's float64 thresholds in the order of the converted node's float32 ones.

    Each converted tree is walked together with the booster's dump from the root, left = true branch;
    every node must match in kind, feature and float32-rounded threshold, so a converter that ordered
    or shaped trees differently fails here instead of giving wrong thresholds.
    """
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    positions: dict[int, dict[int, int]] = {}  # tree -> node id -> position in the node lists
    for position, (tree_id, node_id) in enumerate(zip(attributes["nodes_treeids"], attributes["nodes_nodeids"], strict=True)):
        positions.setdefault(tree_id, {})[node_id] = position
    if sorted(positions) != list(range(len(trees))):
        raise ExportError(f"the converted LightGBM model has trees {sorted(positions)[:5]}..., the booster {len(trees)} trees")
    exact = np.zeros(len(attributes["nodes_nodeids"]), dtype=np.float64)
    for tree_id, tree in enumerate(trees):
        in_tree = positions[tree_id]
        pending = [(tree["tree_structure"], in_tree[_root_id(tree_id, in_tree, attributes)])]
        while pending:
            split, position = pending.pop()
            is_leaf = "leaf_value" in split
            if is_leaf != (attributes["nodes_modes"][position] == b"LEAF"):
                raise ExportError(f"LightGBM tree {tree_id}: converted node {position} and the booster's node disagree on being a leaf")
            if is_leaf:
                continue
            threshold = float(split["threshold"])
            converted = (attributes["nodes_featureids"][position], np.float32(attributes["nodes_values"][position]))
            if converted != (split["split_feature"], np.float32(threshold)):
                raise ExportError(f"LightGBM tree {tree_id}: converted node {position} does not match the booster's split")
            exact[position] = threshold
            pending.append((split["left_child"], in_tree[attributes["nodes_truenodeids"][position]]))
            pending.append((split["right_child"], in_tree[attributes["nodes_falsenodeids"][position]]))
    return exact


def _root_id(tree_id: int, in_tree: dict[int, int], attributes: dict[str, Any]) -> int:
    """The id of the one node of the tree that no branch of it points to (a leaf's child ids are unused zeros)."""
    branches = [position for position in in_tree.values() if attributes["nodes_modes"][position] != b"LEAF"]
    children = {attributes[side][position] for position in branches for side in ("nodes_truenodeids", "nodes_falsenodeids")}
    roots = [node_id for node_id in in_tree if node_id not in children]
    if len(roots) != 1:
        raise ExportError(f"LightGBM tree {tree_id}: the converted tree has {len(roots)} roots, expected one")
    return roots[0]


def _xgboost_node(booster: xgboost.Booster, n_features: int) -> onnx.NodeProto:
    # onnxmltools reads features by position (f0, f1, ...) and refuses named ones; the order is FEATURE_NAMES'.
    unnamed = booster.copy()
    unnamed.feature_names = None
    converted = convert_xgboost(unnamed, name="xgboost", initial_types=_converter_input(n_features), target_opset=_CONVERTER_OPSET)
    return _tree_node(converted, "onnxmltools (XGBoost)")


def _forest_node(forest: RandomForestClassifier, n_features: int) -> onnx.NodeProto:
    converted = convert_sklearn(
        forest,
        name="random_forest",
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={"zipmap": False},
        target_opset=OPSETS,
    )
    return _tree_node(converted, "skl2onnx (RandomForest)")
