"""The ensemble as one ONNX graph: the three tree ensembles and the weighted vote on P(up).

Converters: LightGBM and XGBoost through onnxmltools, the RandomForest through skl2onnx. Each gives a
binary TreeEnsembleClassifier node (ai.onnx.ml opset 3) holding one score per leaf; its trees are
rewritten as the newer TreeEnsemble operator (ai.onnx.ml opset 5), and each model's P(up) is built
from its score as the classifier would (LightGBM, XGBoost: sigmoid(score + base value); the forest:
the averaged leaf probabilities themselves):

    features (float64, n x 12) -> LightGBM trees (float64) -> Cast -> Sigmoid -----+
                               -> Cast float32 -> XGBoost trees -> Add base -> Sigmoid -+-> Concat -> MatMul(weights) -> p_up (n)
                                               -> RandomForest trees --------------+

Why TreeEnsemble: it stores each tree as flat arrays of branches and leaves (split thresholds and
modes as tensors, no leaf records of class ids), so onnxruntime builds the default model's session
in about 77 MB instead of 114 MB, and the stored graph is a third of the size.

Why each model reads the input it does: each graph compares a feature with a threshold exactly as its
library does, so decisions agree row for row, not only on average.

* XGBoost and scikit-learn trees compare float32 features (both libraries cast the input), so their
  trees read the float32 cast; skl2onnx already rounds sklearn's float64 thresholds so that the float32
  comparison gives sklearn's answer.
* LightGBM compares float64 features with float64 thresholds, but onnxmltools stores float32
  thresholds and accepts only float32 input: on the pipeline's holdout that flipped a split for about
  one row in 17,000 (P(up) off by 1e-3, beyond the 1e-5 parity bound). The LightGBM trees therefore
  read the float64 input and get the booster's exact float64 thresholds and leaf values, matched to
  the converted nodes by walking both trees together.

XGBoost and forest leaf values and the vote are float32, so P(up) differs from the native float64 sum
by about 1e-7. The bytes depend only on the models: names are fixed, nothing records a time or a random id.
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

from cryptoml.live.serving import INPUT_NAME, OUTPUT_NAME

# The graph: IR 10, opset 21, ai.onnx.ml 5 (the TreeEnsemble operator).
IR_VERSION = 10
OPSETS = {"": 21, "ai.onnx.ml": 5}
# What the converters are asked for: their TreeEnsembleClassifier node (ai.onnx.ml 3) is all that is read.
_CONVERTER_OPSETS = {"": 17, "ai.onnx.ml": 3}
_ONNXMLTOOLS_OPSET = 15  # the highest opset the onnxmltools converters accept
_CLASSIFIER_OP = "TreeEnsembleClassifier"
_FLOAT_INPUT = "features_float32"
# TreeEnsemble's encodings (ai.onnx.ml 5): node modes, and the aggregate and post-transform used here.
_SPLIT_MODES = {b"BRANCH_LEQ": 0, b"BRANCH_LT": 1, b"BRANCH_GTE": 2, b"BRANCH_GT": 3, b"BRANCH_EQ": 4, b"BRANCH_NEQ": 5}
_LEAF = b"LEAF"
_SUM, _NO_TRANSFORM = 1, 0


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
    lightgbm_node = _lightgbm_classifier(lightgbm_booster, n_features)
    # Per model: its converted trees, the input they read, exact float64 values if any, and the margin added
    # to the summed leaf scores before the sigmoid (None: the forest's leaves are probabilities, averaged).
    models = {
        "lightgbm": (lightgbm_node, INPUT_NAME, _exact_lightgbm_values(lightgbm_node, lightgbm_booster.dump_model()["tree_info"]), 0.0),
        "xgboost": (_xgboost_classifier(xgboost_booster, n_features), _FLOAT_INPUT, None, _xgboost_base_margin(xgboost_booster)),
        "random_forest": (_forest_classifier(forest, n_features), _FLOAT_INPUT, None, None),
    }
    nodes = [helper.make_node("Cast", [INPUT_NAME], [_FLOAT_INPUT], name="cast_float32", to=TensorProto.FLOAT)]
    initializers = [numpy_helper.from_array(np.array([weights[name] for name in models], dtype=np.float32), "vote_weights")]
    for name, (classifier, input_name, exact, margin) in models.items():
        model_nodes, model_initializers = _up_probability(name, _attributes(classifier, name, margin is not None), input_name, exact, margin)
        nodes += model_nodes
        initializers += model_initializers
    nodes += [
        helper.make_node("Concat", [f"{name}_p_up" for name in models], ["probabilities"], name="concat", axis=1),
        helper.make_node("MatMul", ["probabilities", "vote_weights"], [OUTPUT_NAME], name="vote"),
    ]
    graph = helper.make_graph(
        nodes,
        "cryptoml_ensemble",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.DOUBLE, ["rows", n_features])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["rows"])],
        initializer=initializers,
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


def _classifier_node(model: onnx.ModelProto, source: str) -> onnx.NodeProto:
    found = [node for node in model.graph.node if node.op_type == _CLASSIFIER_OP]
    if len(found) != 1:
        raise ExportError(f"{source} gave {len(found)} {_CLASSIFIER_OP} nodes, expected exactly one: the converter changed")
    return found[0]


def _attributes(node: onnx.NodeProto, name: str, logistic: bool) -> dict[str, Any]:
    """The classifier's attributes, if it is the binary form this exporter reads: one score per leaf, for class 1."""
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    if list(attributes["classlabels_int64s"]) != [0, 1] or set(attributes["class_ids"]) != {0}:
        raise ExportError(f"{name}: expected a binary classifier with one score per leaf, got classes {attributes['classlabels_int64s']}")
    expected_transform = b"LOGISTIC" if logistic else b"NONE"
    if attributes["post_transform"] != expected_transform:
        raise ExportError(f"{name}: post transform {attributes['post_transform']!r}, expected {expected_transform!r}")
    unknown = set(attributes["nodes_modes"]) - set(_SPLIT_MODES) - {_LEAF}
    if unknown:
        raise ExportError(f"{name}: node modes {sorted(unknown)} have no TreeEnsemble equivalent here")
    return attributes


def _up_probability(
    name: str, attributes: dict[str, Any], input_name: str, exact: np.ndarray | None, margin: float | None
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing `<name>_p_up` (float32, n x 1): sigmoid(score + margin), or the score itself when margin is None."""
    dtype = np.float64 if exact is not None else np.float32
    score = f"{name}_score"
    nodes = [helper.make_node("TreeEnsemble", [input_name], [score], name=name, domain="ai.onnx.ml", **_tree_arrays(name, attributes, dtype, exact))]
    initializers = []
    if exact is not None:
        nodes.append(helper.make_node("Cast", [score], [f"{score}_float32"], name=f"{name}_cast", to=TensorProto.FLOAT))
        score = f"{score}_float32"
    if margin is not None:
        if margin != 0.0:
            initializers.append(numpy_helper.from_array(np.array([margin], dtype=np.float32), f"{name}_base"))
            nodes.append(helper.make_node("Add", [score, f"{name}_base"], [f"{name}_margin"], name=f"{name}_base"))
            score = f"{name}_margin"
        nodes.append(helper.make_node("Sigmoid", [score], [f"{name}_p_up"], name=f"{name}_sigmoid"))
    else:
        nodes.append(helper.make_node("Identity", [score], [f"{name}_p_up"], name=f"{name}_p_up"))
    return nodes, initializers


def _tree_arrays(name: str, attributes: dict[str, Any], dtype: type, exact: np.ndarray | None) -> dict[str, Any]:
    """TreeEnsemble attributes for the classifier's trees: branches and leaves numbered tree by tree.

    `exact` replaces the converter's float32 thresholds and leaf scores (by node position) when given.
    A tree that is a single leaf gets one branch whose two sides are that leaf: TreeEnsemble's roots are branches.
    """
    modes = attributes["nodes_modes"]
    values = exact if exact is not None else np.asarray(attributes["nodes_values"], dtype=dtype)
    leaf_scores = dict(zip(zip(attributes["class_treeids"], attributes["class_nodeids"], strict=True), attributes["class_weights"], strict=True))
    missing_tracks_true = attributes.get("nodes_missing_value_tracks_true") or [0] * len(modes)
    branches: list[tuple[float, int, int, int]] = []  # split, mode, feature, missing value goes to the true side
    children: list[tuple[int, int]] = []  # (true, false) node positions
    leaves: list[float] = []
    index: dict[int, tuple[int, int]] = {}  # node position -> (branch or leaf index, 1 if leaf)
    roots = []
    for tree_id, in_tree in _positions_by_tree(attributes).items():
        root = in_tree[_root_id(name, tree_id, in_tree, attributes)]
        lone_leaf = modes[root] == _LEAF
        if lone_leaf:
            roots.append(len(branches))
            branches.append((0.0, _SPLIT_MODES[b"BRANCH_LEQ"], 0, 0))
            children.append((root, root))
        for position in sorted(in_tree.values()):
            if modes[position] == _LEAF:
                index[position] = (len(leaves), 1)
                leaves.append(values[position] if exact is not None else leaf_scores[(tree_id, attributes["nodes_nodeids"][position])])
            else:
                index[position] = (len(branches), 0)
                branches.append((values[position], _SPLIT_MODES[modes[position]], attributes["nodes_featureids"][position], missing_tracks_true[position]))
                children.append((in_tree[attributes["nodes_truenodeids"][position]], in_tree[attributes["nodes_falsenodeids"][position]]))
        if not lone_leaf:
            roots.append(index[root][0])
    splits, branch_modes, features, missing = zip(*branches, strict=True)
    true_side = [index[true] for true, _ in children]
    false_side = [index[false] for _, false in children]
    return {
        "tree_roots": roots,
        "nodes_featureids": list(features),
        "nodes_splits": numpy_helper.from_array(np.array(splits, dtype=dtype)),
        "nodes_modes": numpy_helper.from_array(np.array(branch_modes, dtype=np.uint8)),
        "nodes_missing_value_tracks_true": list(missing),
        "nodes_truenodeids": [i for i, _ in true_side],
        "nodes_trueleafs": [leaf for _, leaf in true_side],
        "nodes_falsenodeids": [i for i, _ in false_side],
        "nodes_falseleafs": [leaf for _, leaf in false_side],
        "leaf_targetids": [0] * len(leaves),
        "leaf_weights": numpy_helper.from_array(np.array(leaves, dtype=dtype)),
        "n_targets": 1,
        "aggregate_function": _SUM,
        "post_transform": _NO_TRANSFORM,
    }


def _converter_input(n_features: int) -> list[tuple[str, ConverterFloatTensor]]:
    return [(INPUT_NAME, ConverterFloatTensor([None, n_features]))]


def _positions_by_tree(attributes: dict[str, Any]) -> dict[int, dict[int, int]]:
    """tree id -> node id -> position of the node in the classifier's node lists, trees in id order."""
    positions: dict[int, dict[int, int]] = {}
    for position, (tree_id, node_id) in enumerate(zip(attributes["nodes_treeids"], attributes["nodes_nodeids"], strict=True)):
        positions.setdefault(tree_id, {})[node_id] = position
    return dict(sorted(positions.items()))


def _root_id(name: str, tree_id: int, in_tree: dict[int, int], attributes: dict[str, Any]) -> int:
    """The id of the one node of the tree that no branch of it points to (a leaf's child ids are unused zeros)."""
    branches = [position for position in in_tree.values() if attributes["nodes_modes"][position] != _LEAF]
    children = {attributes[side][position] for position in branches for side in ("nodes_truenodeids", "nodes_falsenodeids")}
    roots = [node_id for node_id in in_tree if node_id not in children]
    if len(roots) != 1:
        raise ExportError(f"{name} tree {tree_id}: the converted tree has {len(roots)} roots, expected one")
    return roots[0]


def _lightgbm_classifier(booster: lightgbm.Booster, n_features: int) -> onnx.NodeProto:
    converted = convert_lightgbm(
        booster, name="lightgbm", initial_types=_converter_input(n_features), zipmap=False, target_opset=_ONNXMLTOOLS_OPSET
    )
    return _classifier_node(converted, "onnxmltools (LightGBM)")


def _exact_lightgbm_values(node: onnx.NodeProto, trees: list[dict[str, Any]]) -> np.ndarray:
    """The booster's float64 thresholds and leaf values, by position in the converted node's lists.

    Each converted tree is walked together with the booster's dump from the root, left = true branch;
    every node must match in kind, feature and float32-rounded threshold, so a converter that ordered
    or shaped trees differently fails here instead of giving wrong values.
    """
    attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    positions = _positions_by_tree(attributes)
    if list(positions) != list(range(len(trees))):
        raise ExportError(f"the converted LightGBM model has trees {list(positions)[:5]}..., the booster {len(trees)} trees")
    exact = np.zeros(len(attributes["nodes_nodeids"]), dtype=np.float64)
    for tree_id, tree in enumerate(trees):
        in_tree = positions[tree_id]
        pending = [(tree["tree_structure"], in_tree[_root_id("LightGBM", tree_id, in_tree, attributes)])]
        while pending:
            split, position = pending.pop()
            is_leaf = "leaf_value" in split
            if is_leaf != (attributes["nodes_modes"][position] == _LEAF):
                raise ExportError(f"LightGBM tree {tree_id}: converted node {position} and the booster's node disagree on being a leaf")
            if is_leaf:
                exact[position] = float(split["leaf_value"])
                continue
            threshold = float(split["threshold"])
            converted = (attributes["nodes_featureids"][position], np.float32(attributes["nodes_values"][position]))
            if converted != (split["split_feature"], np.float32(threshold)):
                raise ExportError(f"LightGBM tree {tree_id}: converted node {position} does not match the booster's split")
            exact[position] = threshold
            pending.append((split["left_child"], in_tree[attributes["nodes_truenodeids"][position]]))
            pending.append((split["right_child"], in_tree[attributes["nodes_falsenodeids"][position]]))
    return exact


def _xgboost_classifier(booster: xgboost.Booster, n_features: int) -> onnx.NodeProto:
    # onnxmltools reads features by position (f0, f1, ...) and refuses named ones; the order is FEATURE_NAMES'.
    unnamed = booster.copy()
    unnamed.feature_names = None
    converted = convert_xgboost(unnamed, name="xgboost", initial_types=_converter_input(n_features), target_opset=_ONNXMLTOOLS_OPSET)
    return _classifier_node(converted, "onnxmltools (XGBoost)")


def _xgboost_base_margin(booster: xgboost.Booster) -> float:
    """logit(base_score), XGBoost's starting margin for binary:logistic.

    Read from the booster, not from the converter: onnxmltools 1.16 passes base_score untransformed
    when the first tree is a single leaf of value 0 (P(up) was off by 0.1 on such a model).
    """
    raw = json.loads(booster.save_config())["learner"]["learner_model_param"]["base_score"]
    base_score = float(json.loads(raw)[0] if raw.startswith("[") else raw)  # "[5.0E-1]" since XGBoost 3
    return float(np.log(base_score / (1.0 - base_score)))


def _forest_classifier(forest: RandomForestClassifier, n_features: int) -> onnx.NodeProto:
    converted = convert_sklearn(
        forest,
        name="random_forest",
        initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
        options={"zipmap": False},
        target_opset=_CONVERTER_OPSETS,
    )
    return _classifier_node(converted, "skl2onnx (RandomForest)")
