"""errors.ConfigError: one line, also when it comes back from a DataLoader worker."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, Dataset

from cwps_lightning.data.base import DataConfigError
from cwps_lightning.errors import ConfigError


class Unreadable(Dataset):
    def __len__(self):
        return 2

    message = "image x.jpg is truncated; data.skip_corrupt=true skips it"

    def __getitem__(self, i):
        raise DataConfigError(self.message)


def test_an_error_from_a_dataloader_worker_is_its_own_line():
    """(torch builds it again in the main process from the worker's whole traceback)"""
    with pytest.raises(DataConfigError) as err:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert str(err.value) == ("image x.jpg is truncated; data.skip_corrupt=true skips it "
                              "(in DataLoader worker process 0)")


def test_a_message_over_lines_from_a_worker_is_kept_whole(monkeypatch):
    monkeypatch.setattr(Unreadable, "message", "cannot read x.jpg (bad header\nat offset 3)")
    with pytest.raises(DataConfigError) as err:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert str(err.value) == ("cannot read x.jpg (bad header\nat offset 3) (in DataLoader "
                              "worker process 0)")


def test_other_messages_are_kept_as_given():
    message = "Caught nothing here.\nOriginal text"
    assert str(ConfigError(message)) == message
    assert str(ConfigError("a", "b")) == "('a', 'b')"


class Rewrapped(Unreadable):
    def __getitem__(self, i):
        try:
            raise DataConfigError("a first try failed")
        except DataConfigError as err:
            raise DataConfigError("x.jpg is unreadable after a retry") from err


def test_a_chained_error_from_a_worker_keeps_the_last_message():
    with pytest.raises(DataConfigError) as err:
        next(iter(DataLoader(Rewrapped(), num_workers=1)))
    assert str(err.value) == "x.jpg is unreadable after a retry (in DataLoader worker process 0)"
