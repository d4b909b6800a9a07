"""timm_mimo.eval.ensemble: a deep ensemble is one more model with member logits; its cost; TorchUncertainty's view."""
import importlib.util

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import timm_mimo  # noqa: F401  (registers the models)
from timm_mimo.eval.predict import collect_predictions
from timm_mimo.mimo import MemberOutputs
from timm_mimo.eval.ensemble import DeepEnsemble, MembersAsEstimators, inference_cost
from timm_mimo.eval.metrics import classification_metrics
from timm_mimo.eval.uncertainty import ood_metrics

CLASSES = 4


@pytest.fixture(scope='module')
def networks(one_thread):
    """A plain timm network (M = 1) and a MixMo network (M = 2), random weights, eval mode."""
    torch.manual_seed(0)
    return [timm.create_model('resnet10t', num_classes=CLASSES).eval(),
            timm.create_model('wrn16_2_mixmo2', num_classes=CLASSES).eval()]


@pytest.fixture(scope='module')
def images():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(24, 3, 16, 16, generator=gen), torch.randint(0, CLASSES, (24,), generator=gen)


def members_of(model, x):
    return MemberOutputs(model).members(model, x)


@torch.no_grad()
def test_deep_ensemble_members_are_its_networks_members_and_combine_by_the_rule(networks, images):
    x, _ = images
    ensemble = DeepEnsemble(networks)
    expected = torch.cat([members_of(net, x) for net in networks], dim=1)
    assert ensemble.num_members == 3 and ensemble.members_per_network == [1, 2]
    assert torch.equal(ensemble(x, members=True), expected)
    # mean-prob (the default): softmax of the output is the mean member probability
    assert torch.allclose(ensemble(x).softmax(-1), expected.softmax(-1).mean(1), atol=1e-6)
    assert torch.allclose(DeepEnsemble(networks, 'logits')(x), expected.mean(1), atol=1e-6)
    assert ensemble.pretrained_cfg['architecture'] == 'deep ensemble: 1 x resnet10t + 1 x wrn16_2_mixmo2'
    with pytest.raises(ValueError, match='unknown ensemble rule'):
        DeepEnsemble(networks, 'vote')


def test_collect_predictions_serves_one_network_and_many(networks, images):
    x, y = images
    loader = list(zip(x.split(8), y.split(8)))
    ensemble_logits, ensemble_members, labels = collect_predictions(DeepEnsemble(networks), loader)
    alone = [collect_predictions(net, loader) for net in networks]
    assert torch.equal(ensemble_members, torch.cat([members for _, members, _ in alone], dim=1))
    assert torch.equal(labels, y)
    metrics = classification_metrics(ensemble_logits, labels, ensemble_members)
    assert len(metrics['member_top1']) == 3 and metrics['disagreement'] is not None


def test_inference_cost_sums_the_networks(networks, images):
    image = images[0][0]
    alone = [inference_cost(net, image) for net in networks]
    together = inference_cost(DeepEnsemble(networks), image)
    assert [c['forward_passes'] for c in alone] == [1, 1] and together['forward_passes'] == 2
    assert together['params'] == sum(c['params'] for c in alone) == sum(
        p.numel() for net in networks for p in net.parameters())
    assert together['flops'] == sum(c['flops'] for c in alone) > 0


@torch.no_grad()
def test_members_as_estimators_stacks_members_member_major(networks, images):
    x, _ = images
    for model in (networks[0], networks[1], DeepEnsemble(networks)):
        members = members_of(model, x)  # (B, M, K)
        stacked = MembersAsEstimators(model)(x)
        assert stacked.shape == (x.shape[0] * members.shape[1], CLASSES)
        # rows m B .. (m + 1) B - 1 are member m: TorchUncertainty's "(m b) c -> b m c"
        assert torch.equal(stacked.view(members.shape[1], x.shape[0], CLASSES).transpose(0, 1), members)


@pytest.mark.skipif(importlib.util.find_spec('torch_uncertainty') is None,
                    reason='TorchUncertainty is not installed (pip install -e .[torch-uncertainty])')
def test_torch_uncertainty_routine_evaluates_the_adapter_as_we_do(networks, images):
    """TorchUncertainty's own test loop over the adapter gives our accuracy, NLL, ECE, Brier, diversity, OOD
    AUROC and cost (its ensemble rule is the mean of the member probabilities, our mean-prob)."""
    import lightning
    from torch_uncertainty.routines import ClassificationRoutine

    x, y = images
    x_ood = 3 * torch.randn(20, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ensemble = DeepEnsemble(networks, 'probs')
    routine = ClassificationRoutine(MembersAsEstimators(ensemble), CLASSES, is_ensemble=True, eval_ood=True)
    trainer = lightning.Trainer(accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False)
    batch = 8
    loaders = [DataLoader(TensorDataset(x, y), batch_size=batch),
               DataLoader(TensorDataset(x_ood, torch.zeros(len(x_ood), dtype=torch.long)), batch_size=batch)]
    theirs = trainer.test(routine, dataloaders=loaders, verbose=False)[0]

    logits, members, labels = collect_predictions(ensemble, zip(x.split(batch), y.split(batch)))
    ood_logits, ood_members, _ = collect_predictions(ensemble, [(x_ood, torch.zeros(len(x_ood), dtype=torch.long))])
    ours = classification_metrics(logits, labels, members)
    assert theirs['test/cls/Acc'] == pytest.approx(ours['top1'] / 100, abs=1e-6)
    for their_key, our_key in (('test/cls/NLL', 'nll'), ('test/cal/ECE', 'ece'), ('test/cls/Brier', 'brier'),
                               ('test/ens_Disagreement', 'disagreement')):
        assert theirs[their_key] == pytest.approx(ours[our_key], abs=1e-5), their_key
    # its default OOD criterion is the maximum softmax probability, OOD as the positive class
    msp = ood_metrics(logits, ood_logits, members, ood_members)['msp']
    assert theirs['ood/AUROC'] == pytest.approx(msp['auroc'], abs=1e-5)
    cost = inference_cost(ensemble, x[0])
    assert theirs['test/cplx/params'] == cost['params']
    assert theirs['test/cplx/flops'] == batch * cost['flops']  # it counts the first batch
