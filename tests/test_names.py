import re

import pytest
import torch
from matrix import assert_same, snapshot
from torch import nn

import frozenopt
import frozenopt.optim
from frozenopt.names import NameIndex, describe, resolve_targets  # noqa: E402

# ---------------------------------------------------------------- fixtures


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        self.attention.self.query = nn.Linear(2, 2)
        self.output = nn.Module()
        self.output.dense = nn.Linear(2, 2)


class BertLike(nn.Module):
    def __init__(self, layers=12):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word = nn.Embedding(5, 2)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Layer() for _ in range(layers))
        self.pooler = nn.Module()
        self.pooler.dense = nn.Linear(2, 2)
        self.classifier = nn.Linear(2, 2)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        self.fc2 = nn.Linear(2, 2)
        self.fc20 = nn.Linear(2, 2)
        self.fc2x = nn.Linear(2, 2, bias=False)


def index_for(model):
    names, params = zip(*model.named_parameters())
    return NameIndex(list(names), list(params))


def names_of(index, idx):
    return [index.name_of(i) for i in idx]


@pytest.fixture
def bert():
    model = BertLike()
    return model, index_for(model)


@pytest.fixture
def mlp():
    model = MLP()
    return model, index_for(model)


# ---------------------------------------------------------------- NameIndex


def test_len_and_name_of():
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(2))
    index = NameIndex(["a", None], [a, b])
    assert len(index) == 2
    assert index.name_of(0) == "a"
    assert index.name_of(1) == "<param 1>"


def test_length_mismatch_rejected():
    with pytest.raises(ValueError):
        NameIndex(["a"], [])


# ---------------------------------------------------------------- exact / prefix strings


def test_exact_name(mlp):
    _, index = mlp
    assert names_of(index, resolve_targets(index, ("fc2.weight",))) == ["fc2.weight"]


def test_prefix_never_matches_sibling_with_longer_name(mlp):
    _, index = mlp
    assert names_of(index, resolve_targets(index, ("fc2",))) == ["fc2.weight", "fc2.bias"]


def test_prefix_matches_param_named_exactly():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    index = NameIndex(["fc2", "fc20"], [p, q])
    assert resolve_targets(index, ("fc2",)) == [0]


def test_nested_prefix(bert):
    _, index = bert
    got = names_of(index, resolve_targets(index, ("encoder.layer.3.attention",)))
    assert got == [
        "encoder.layer.3.attention.self.query.weight",
        "encoder.layer.3.attention.self.query.bias",
    ]


def test_result_sorted_and_deduplicated(mlp):
    _, index = mlp
    assert resolve_targets(index, ("fc2.bias", "fc1", "fc2")) == [0, 1, 2, 3]


def test_empty_targets_resolve_to_nothing(mlp):
    _, index = mlp
    assert resolve_targets(index, ()) == []


# ---------------------------------------------------------------- globs


def test_glob_star_is_one_component(bert):
    _, index = bert
    got = names_of(index, resolve_targets(index, ("encoder.layer.*.attention",)))
    assert len(got) == 24
    assert all(".attention.self.query." in n for n in got)


def test_glob_star_does_not_cross_dots(bert):
    _, index = bert
    # "encoder.*" only reaches the prefix "encoder.layer", which covers all layers,
    # but "encoder.*.query" cannot reach "encoder.layer.N.attention.self.query".
    assert len(resolve_targets(index, ("encoder.*",))) == 48
    with pytest.raises(ValueError, match="no parameter matches"):
        resolve_targets(index, ("encoder.*.query",))


def test_glob_question_mark(bert):
    _, index = bert
    got = names_of(index, resolve_targets(index, ("encoder.layer.1?",)))
    layers = {n.split(".")[2] for n in got}
    assert layers == {"10", "11"}  # not layer 1


def test_glob_partial_component(mlp):
    _, index = mlp
    got = names_of(index, resolve_targets(index, ("fc2*.weight",)))
    assert got == ["fc2.weight", "fc20.weight", "fc2x.weight"]


def test_glob_char_class(bert):
    _, index = bert
    got = names_of(index, resolve_targets(index, ("encoder.layer.[0-2].output",)))
    assert {n.split(".")[2] for n in got} == {"0", "1", "2"}
    got = names_of(index, resolve_targets(index, ("encoder.layer.[!0-8].output",)))
    assert {n.split(".")[2] for n in got} == {"9"}


def test_glob_double_star_crosses_dots(bert):
    _, index = bert
    got = names_of(index, resolve_targets(index, ("**.query",)))
    assert len(got) == 24
    got = names_of(index, resolve_targets(index, ("encoder.**.bias",)))
    assert len(got) == 24 and all(n.endswith(".bias") for n in got)


def test_glob_star_matches_every_named_param(bert):
    _, index = bert
    assert resolve_targets(index, ("*",)) == list(range(len(index)))


def test_glob_ignores_unnamed_params():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    index = NameIndex(["a", None], [p, q])
    assert resolve_targets(index, ("*",)) == [0]


# ---------------------------------------------------------------- regex


def test_regex_fullmatch_on_prefixes(bert):
    _, index = bert
    got = names_of(index, resolve_targets(index, (re.compile(r"encoder\.layer\.(0|11)"),)))
    assert {n.split(".")[2] for n in got} == {"0", "11"}


def test_regex_is_fullmatch_not_search(mlp):
    _, index = mlp
    # Would find "fc2" inside "fc20" with search(); fullmatch must not.
    assert names_of(index, resolve_targets(index, (re.compile("fc2"),))) == [
        "fc2.weight",
        "fc2.bias",
    ]
    with pytest.raises(ValueError, match="no parameter matches"):
        resolve_targets(index, (re.compile("c2"),))


# ---------------------------------------------------------------- objects


def test_module_target(bert):
    model, index = bert
    got = names_of(index, resolve_targets(index, (model.pooler,)))
    assert got == ["pooler.dense.weight", "pooler.dense.bias"]


def test_module_partially_in_optimizer():
    model = MLP()
    index = NameIndex(["w"], [model.fc1.weight])
    assert resolve_targets(index, (model.fc1,)) == [0]


def test_module_with_no_params_in_optimizer(mlp):
    _, index = mlp
    with pytest.raises(ValueError, match=r"Module\(Linear\) has no parameters"):
        resolve_targets(index, (nn.Linear(2, 2),))
    with pytest.raises(ValueError, match="has no parameters"):
        resolve_targets(index, (nn.ReLU(),))


def test_parameter_target(mlp):
    model, index = mlp
    assert names_of(index, resolve_targets(index, (model.fc20.bias,))) == ["fc20.bias"]


def test_tensor_not_in_optimizer(mlp):
    _, index = mlp
    with pytest.raises(ValueError, match="is not a parameter of this optimizer"):
        resolve_targets(index, (nn.Parameter(torch.zeros(3)),))
    with pytest.raises(ValueError, match="is not a parameter of this optimizer"):
        resolve_targets(index, (torch.zeros(3),))


def test_unnamed_params_match_by_object():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    index = NameIndex([None, None], [p, q])
    assert resolve_targets(index, (q,)) == [1]


# ---------------------------------------------------------------- nesting


def test_nested_containers(mlp):
    model, index = mlp
    targets = (["fc1", ("fc2.bias", {"fc20"})], (p for p in [model.fc2x.weight]))
    got = names_of(index, resolve_targets(index, targets))
    assert got == ["fc1.weight", "fc1.bias", "fc2.bias", "fc20.weight", "fc20.bias", "fc2x.weight"]


def test_named_parameters_generator_as_target(mlp):
    model, index = mlp
    assert resolve_targets(index, (model.named_parameters(),)) == list(range(len(index)))


def test_resolve_does_not_mutate_list(mlp):
    _, index = mlp
    targets = ["fc1", ["fc2"]]
    resolve_targets(index, (targets,))
    assert targets == ["fc1", ["fc2"]]


# ---------------------------------------------------------------- errors


def test_no_match_lists_closest_names(mlp):
    _, index = mlp
    with pytest.raises(ValueError) as err:
        resolve_targets(index, ("fc3",))
    msg = str(err.value)
    assert "no parameter matches 'fc3'" in msg
    assert "closest names:" in msg and "'fc2'" in msg and "'fc1'" in msg


def test_no_match_falls_back_to_top_level_names(bert):
    _, index = bert
    with pytest.raises(ValueError) as err:
        resolve_targets(index, ("zzzzzzzzzzzzzzzzzzzzzzzz",))
    msg = str(err.value)
    assert "top-level names:" in msg and "'embeddings'" in msg and "'classifier'" in msg


def test_no_match_for_glob_and_regex(bert):
    _, index = bert
    with pytest.raises(ValueError, match=r"no parameter matches 'pooler\.x\*'"):
        resolve_targets(index, ("pooler.x*",))
    with pytest.raises(ValueError, match="no parameter matches re.compile"):
        resolve_targets(index, (re.compile("nothing"),))


@pytest.mark.parametrize("bad", [1, None, 1.5, {"fc1": 1}, b"fc1", True])
def test_bad_types(mlp, bad):
    _, index = mlp
    with pytest.raises(TypeError) as err:
        resolve_targets(index, (bad,))
    assert type(bad).__name__ in str(err.value)
    assert "nn.Module" in str(err.value)  # lists what is accepted


@pytest.mark.parametrize("bad", ["", "fc2.", "encoder.*."])
def test_empty_or_trailing_dot_string(mlp, bad):
    _, index = mlp
    with pytest.raises(ValueError):
        resolve_targets(index, (bad,))


def test_string_target_on_unnamed_params():
    p = nn.Parameter(torch.zeros(1))
    index = NameIndex([None], [p])
    with pytest.raises(ValueError, match="plain parameters"):
        resolve_targets(index, ("fc1",))
    with pytest.raises(ValueError, match="plain parameters"):
        resolve_targets(index, (re.compile(".*"),))


def test_one_bad_target_fails_whole_call(mlp):
    _, index = mlp
    with pytest.raises(ValueError):
        resolve_targets(index, ("fc1", "fc3"))
    with pytest.raises(TypeError):
        resolve_targets(index, (["fc1", 7],))


def test_describe():
    assert describe("fc1") == "'fc1'"
    assert describe(re.compile("a")) == "re.compile('a')"
    assert describe(nn.Linear(2, 3)) == "Module(Linear)"
    assert describe(nn.Parameter(torch.zeros(2, 3))) == "Parameter(shape=(2, 3))"


# ---------------------------------------------------------------- scale


def test_large_index_resolves():
    # Sanity check only (no timing): 20,000 params, 2,000 blocks x 10.
    names = [f"blocks.{b}.sub.p{k}" for b in range(2000) for k in range(10)]
    params = [torch.empty(0) for _ in names]
    index = NameIndex(names, params)
    assert len(index) == 20000
    assert len(resolve_targets(index, ("blocks.1999",))) == 10
    assert len(resolve_targets(index, ("blocks.1??.sub",))) == 1000
    assert len(resolve_targets(index, ("**.p3",))) == 2000
    assert len(resolve_targets(index, (re.compile(r"blocks\.\d+\.sub\.p0"),))) == 2000
    assert len(resolve_targets(index, (params,))) == 20000
    with pytest.raises(ValueError, match="closest names"):
        resolve_targets(index, ("blocks.1999.sub.p99",))


def test_aliases_resolve_like_names_and_show_in_name_of():
    wte, h = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
    index = NameIndex(["wte.weight", "h.weight"], [wte, h], {"wte.weight": ["lm_head.weight"]})
    assert index.name_of(0) == "wte.weight (= lm_head.weight)" and index.param_name(0) == "wte.weight"
    assert resolve_targets(index, ("lm_head",)) == [0]
    assert resolve_targets(index, ("lm_head.weight",)) == [0]
    assert resolve_targets(index, ("wte.weight (= lm_head.weight)",)) == [0]  # what name_of shows
    assert resolve_targets(index, ("*.weight",)) == [0, 1]
    with pytest.raises(ValueError, match="not the name of a param"):
        NameIndex(["a"], [wte], {"b": ["c"]})


def test_exact_name_wins_over_glob_reading():
    params = [nn.Parameter(torch.zeros(1)) for _ in range(4)]
    index = NameIndex(["layer[0].w", "layer0.w", "a*b.w", "axb.w"], params)
    assert resolve_targets(index, ("layer[0]",)) == [0]  # a glob would match layer0
    assert resolve_targets(index, ("a*b",)) == [2]  # a glob would match axb too
    assert resolve_targets(index, ("a?b",)) == [2, 3]  # no such name: read as a glob
    assert resolve_targets(index, ("layer[0-9]",)) == [1]


# ---------------------------------------------------------------- through the optimizer


class GPT(nn.Module):
    """GPT-style weight tying: lm_head.weight is transformer.wte.weight."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(10, 4)
        self.transformer.h = nn.Linear(4, 4)
        self.lm_head = nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.transformer.wte.weight


TIED = "transformer.wte.weight (= lm_head.weight)"


@pytest.mark.parametrize("target", ["lm_head", "lm_head.weight", "transformer.wte", "transformer.wte.weight", TIED])
def test_tied_weight_is_frozen_by_every_name(target):
    model = GPT()
    opt = frozenopt.AdamW(model)
    assert opt.freeze(target) == [TIED]
    assert opt.frozen == [TIED]
    assert not model.lm_head.weight.requires_grad
    assert opt.is_frozen("lm_head") and opt.is_frozen("transformer.wte") and opt.is_frozen(model.lm_head)
    assert not opt.is_frozen("transformer.h")
    assert opt.unfreeze(*opt.frozen) == [TIED]  # what `frozen` lists is accepted back
    assert opt.frozen == [] and model.lm_head.weight.requires_grad


def test_tied_weight_of_a_hugging_face_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    opt = frozenopt.AdamW(model)
    assert opt.freeze("lm_head") == [TIED]
    assert opt.is_frozen("transformer.wte")


def test_tied_weight_frozen_set_survives_a_checkpoint():
    model = GPT()
    opt = frozenopt.AdamW(model)
    opt.freeze("lm_head")
    saved = opt.state_dict()
    fresh = frozenopt.AdamW(GPT())
    fresh.load_state_dict(saved)
    assert fresh.frozen == [TIED]
    torch.optim.AdamW(GPT().parameters()).load_state_dict(saved)  # torch.optim takes it too


def test_data_parallel_is_unwrapped():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = frozenopt.SGD(nn.DataParallel(model), lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert opt.freeze("0") == ["0.weight", "0.bias"]


def test_optimizer_matches_exact_names_before_globs():
    model = nn.ModuleDict({"layer[0]": nn.Linear(2, 2), "layer0": nn.Linear(2, 2),
                           "a*b": nn.Linear(2, 2), "axb": nn.Linear(2, 2)})
    opt = frozenopt.SGD(model, lr=0.1)
    assert opt.freeze("layer[0]") == ["layer[0].weight", "layer[0].bias"]
    assert opt.freeze("a*b") == ["a*b.weight", "a*b.bias"]
    assert opt.frozen == ["layer[0].weight", "layer[0].bias", "a*b.weight", "a*b.bias"]


def test_is_frozen_needs_a_target():
    model = nn.Linear(2, 2)
    opt = frozenopt.SGD(model, lr=0.1)
    before = snapshot(opt)
    with pytest.raises(TypeError, match=r"is_frozen\(\) needs a target"):
        opt.is_frozen()
    assert_same(before, snapshot(opt))


def test_freeze_to_refuses_a_single_group():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = frozenopt.SGD(model, lr=0.1)
    before = snapshot(opt)
    for n in (-1, 0, 1):
        with pytest.raises(ValueError, match=r"single param group.*freeze\('\*'\)"):
            opt.freeze_to(n)
    assert_same(before, snapshot(opt))


def test_name_index_is_built_once_and_rebuilt_when_groups_change(monkeypatch):
    built = []

    class Counting(frozenopt.optim.base.NameIndex):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(frozenopt.optim.base, "NameIndex", Counting)
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(4)])
    opt = frozenopt.SGD(model, lr=0.1)
    built.clear()
    for p in model.parameters():
        assert not opt.is_frozen(p)
    opt.freeze("0")
    opt.unfreeze("0.bias")
    assert opt.is_frozen("0.weight") and opt.frozen == ["0.weight"]
    assert len(built) == 1
    extra = nn.Linear(2, 2)
    opt.add_param_group({"params": list(extra.named_parameters(prefix="extra"))})
    assert opt.freeze("extra") == ["extra.weight", "extra.bias"]
    assert len(built) == 2
    # a param swapped in place in a group's list: freeze/unfreeze/frozen check every entry
    swapped = nn.Parameter(torch.zeros(2))
    opt.param_groups[0]["params"][1] = swapped
    assert opt.freeze(swapped) == ["0.bias"]
    assert len(built) == 3

