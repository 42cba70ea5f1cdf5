"""A recurrent network for the same image datasets: the kind of model dynamic quantization is for."""

from __future__ import annotations

from torch import nn


class RowLSTM(nn.Module):
    """Reads an image row by row (each row one time step) with an LSTM, classifies the last state
    with a Linear layer: Linear + LSTM weights are what dynamic quantization turns into int8."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, hidden: int = 64):
        super().__init__()
        self.lstm = nn.LSTM(in_channels * image_size, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        # (batch, channels, rows, cols) -> (batch, rows, channels * cols): one row per time step.
        rows = x.permute(0, 2, 1, 3).flatten(2)
        out, _ = self.lstm(rows)
        return self.fc(out[:, -1])
