"""Environment ``textarena``: a single-player game of TextArena (https://github.com/LeonGuertler/TextArena),
run locally, as an adapter to a maintained environment library.

    env: {name: textarena, game: GuessTheNumber-v0, max_turns: 10}

Each trajectory plays one game: ``reset`` starts it with a seed fixed by the task's row (so the G
trajectories of a prompt play the same game, and the held-out split plays held-out seeds), the
game's opening text replaces the task's prompt, and each assistant turn is the player's move (the
game reads what it wants from it, e.g. a ``[guess]`` in brackets). The game's new text after each
move is the observation. The reward is the game's for player 0 when it ended (a win is 1),
else 0, read as ``accuracy``. Any task serves as the row source (its rows only seed the games:
``task: {name: arithmetic}`` gives a fixed train / held-out split of seeds).

Not covered: multi-player games (the other players would need a policy of their own).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import rlbench


@rlbench.hookimpl
def rlbench_environments():
    return {"textarena": "rlbench.plugins.environments.textarena:TextArenaEnv"}


@dataclass
class TextArenaConfig:
    game: str = "GuessTheNumber-v0"  # a TextArena environment id with one player

    def validate(self):
        try:
            import textarena
        except ImportError:
            raise ValueError("env textarena needs the textarena package (pip install textarena)") from None
        ids = textarena.envs.registration.ENV_REGISTRY
        if self.game not in ids:
            import difflib

            near = difflib.get_close_matches(self.game, list(ids), n=3)
            raise ValueError(f"TextArena has no game {self.game!r}" + (f"; did you mean {', '.join(near)}?" if near else ""))


class TextArenaEnv:
    Config = TextArenaConfig

    def __init__(self, options: TextArenaConfig, task=None):
        self.options = options
        self.game = None
        self.seen = ""
        self.outcome = None

    def _observation(self) -> str:
        _, text = self.game.get_observation()
        text = text if isinstance(text, str) else "\n".join(str(part[1]) if isinstance(part, tuple) else str(part)
                                                             for part in text)
        new = text[len(self.seen):] if text.startswith(self.seen) else text
        self.seen = text
        return new.strip()

    def reset(self, **row) -> str:
        import textarena

        seed = int.from_bytes(hashlib.sha256(str(row.get("prompt_id", "")).encode()).digest()[:4], "big")
        self.game = textarena.make(self.options.game)
        self.game.reset(num_players=1, seed=seed)
        self.seen, self.outcome = "", None
        return self._observation()

    def step(self, text: str):
        done, _ = self.game.step(action=text)
        if done:
            rewards, _ = self.game.close()
            self.outcome = (rewards or {}).get(0, 0)
            return None, True
        return self._observation(), False

    def get_reward(self) -> float:
        return 1.0 if self.outcome is not None and self.outcome > 0 else 0.0
