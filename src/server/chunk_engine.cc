#include "server/chunk_engine.h"

#include <algorithm>
#include <thread>

#include <fmt/format.h>

namespace shardps::server {

void EngineActions::Append(EngineActions&& o) {
  for (auto& a : o.acks) acks.push_back(std::move(a));
  for (auto& st : o.steps) steps.push_back(std::move(st));
  release.insert(release.end(), o.release.begin(), o.release.end());
  for (auto& g : o.admit) admit.push_back(std::move(g));
  applied += o.applied;
  duplicates += o.duplicates;
  late += o.late;
  published += o.published;
  sums_allocated += o.sums_allocated;
  parked_buffers_delta += o.parked_buffers_delta;
}

ChunkEngine::ChunkEngine(const EngineConfig& cfg, std::unique_ptr<UpdateRule> rule,
                         SlotMemory slots, std::function<void(std::function<void()>)> to_owner,
                         std::function<void(EngineActions)> later)
    : cfg_(cfg),
      rule_(std::move(rule)),
      slots_(slots),
      to_owner_(std::move(to_owner)),
      later_(std::move(later)),
      configured_quorum_(cfg.quorum == 0 ? cfg.num_workers : std::min(cfg.quorum, cfg.num_workers)),
      quorum_(configured_quorum_),
      backups_(cfg.mode == Mode::kSync && quorum_ < cfg.num_workers),
      live_workers_(cfg.num_workers),
      removed_(cfg.num_workers, false),
      last_seq_(cfg.num_workers, cfg.mode == Mode::kSync ? cfg.initial_version : 0),
      join_from_(cfg.num_workers, 0),
      conn_of_(cfg.num_workers, nullptr),
      departed_(cfg.num_workers, false) {
  if (cfg.initial_last_seq.size() == cfg.num_workers) {
    last_seq_ = cfg.initial_last_seq;
    UpdateSlowest();
  }
  if (cfg.mode == Mode::kSync && cfg.initial_join_from.size() == cfg.num_workers) {
    join_from_ = cfg.initial_join_from;
    for (uint32_t w = 0; w < cfg.num_workers; ++w)
      if (join_from_[w] > cfg.initial_version + 1) joiners_.push_back(w);
  }
  version_.store(cfg.initial_version, std::memory_order_release);
  Stamp(Slot(cfg.initial_version), cfg.initial_version + 1);
}

bool ChunkEngine::Admissible(uint64_t seq) const {
  switch (cfg_.mode) {
    case Mode::kSync:
      return seq <= version() + cfg_.max_steps_ahead;
    case Mode::kAsync:
      return true;
    case Mode::kSsp:
      // Step s starts once every live worker applied step s - K - 1.
      return seq <= slowest_.load(std::memory_order_acquire) + cfg_.staleness + 1;
  }
  return true;
}

bool ChunkEngine::GrantAdmissible(uint64_t seq) const {
  if (cfg_.mode == Mode::kSync && hold_new_steps_.load(std::memory_order_acquire) &&
      seq > version() + 1)
    return false;
  return Admissible(seq);
}

bool ChunkEngine::HeldForCopy(const LandedPush& p) const {
  return cfg_.mode == Mode::kSync && hold_new_steps_.load(std::memory_order_relaxed) &&
         !steps_.count(p.seq);
}

bool ChunkEngine::HeldBack(const LandedPush& p) const {
  // A backup's copy in ssp mode (pushes its primary forwarded) does not wait for the slowest
  // worker: the primary holds each push back itself and acknowledges it only once the backup
  // did, so the bound is kept there; and the backup would never learn that a worker left (its
  // pushes come over the primary's connection), so its clock would hold the others for ever.
  if (cfg_.mode == Mode::kSsp && p.reply.replica) return false;
  return !Admissible(p.seq);
}

void ChunkEngine::UpdateSlowest() {
  uint64_t slowest = uint64_t{1} << 62;  // nobody left: nothing holds a worker back
  for (uint32_t w = 0; w < cfg_.num_workers; ++w)
    if (!departed_[w]) slowest = std::min(slowest, last_seq_[w]);
  slowest_.store(slowest, std::memory_order_release);
}

float ChunkEngine::WeightOf(const LandedPush& p, uint64_t* staleness) const {
  const uint64_t v = version();
  *staleness = v > p.base_version ? v - p.base_version : 0;
  float w = cfg_.weights.empty() ? 1.0f : cfg_.weights[p.worker];
  if (cfg_.weight_rule == WeightRule::kStaleness) w = w / (1.0f + static_cast<float>(*staleness));
  return w;
}

namespace {
void RaiseMax(std::atomic<uint64_t>& a, uint64_t v) {
  uint64_t cur = a.load(std::memory_order_relaxed);
  while (v > cur && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}
}  // namespace

void ChunkEngine::CountApplied(const LandedPush& p, uint64_t staleness, uint64_t behind) {
  WorkerCounters* c = Counters(p.worker);
  if (!c) return;
  c->pushes.fetch_add(1, std::memory_order_relaxed);
  c->staleness_sum.fetch_add(staleness, std::memory_order_relaxed);
  RaiseMax(c->staleness_max, staleness);
  RaiseMax(c->behind_max, behind);
}

void ChunkEngine::DropLate(LandedPush& p, EngineActions* out) {
  last_seq_[p.worker] = p.seq;
  out->late++;
  out->release.push_back(p.buffer);
  if (WorkerCounters* c = Counters(p.worker)) {
    c->late.fetch_add(1, std::memory_order_relaxed);
    RaiseMax(c->behind_max, version() + 1 > p.seq ? version() + 1 - p.seq : 0);
  }
  auto open = steps_.find(p.seq);
  if (open != steps_.end()) {
    // The step has its quorum but is not published yet: answered when it is.
    open->second.acks.push_back({std::move(p.reply), true});
  } else {
    out->acks.push_back({std::move(p.reply), Status::OK(), version(), true});
  }
}

Result<bool> ChunkEngine::Admit(const ParkedGrant& g) {
  std::lock_guard<std::mutex> lock(grants_mu_);
  // The version is read under the lock that AdmitGrants takes after publishing, so a grant is
  // either admitted here or parked where the next publication finds it.
  if (GrantAdmissible(g.seq)) return true;
  if (grants_.size() >= cfg_.max_parked_grants)
    return Status::ResourceExhausted(
        fmt::format("{} grant requests already wait for this chunk", grants_.size()));
  if (WorkerCounters* c = Counters(g.worker)) c->waits.fetch_add(1, std::memory_order_relaxed);
  grants_.push_back(g);
  return false;
}

size_t ChunkEngine::parked_grants() const {
  std::lock_guard<std::mutex> lock(grants_mu_);
  return grants_.size();
}

void ChunkEngine::AdmitGrants(EngineActions* out) {
  std::lock_guard<std::mutex> lock(grants_mu_);
  if (grants_.empty()) return;
  std::deque<ParkedGrant> keep;
  for (auto& g : grants_) {
    if (GrantAdmissible(g.seq)) {
      out->admit.push_back(std::move(g));
    } else {
      keep.push_back(std::move(g));
    }
  }
  grants_.swap(keep);
}

EngineActions ChunkEngine::OnPush(LandedPush p) {
  EngineActions out;
  if (!forwarded_.empty()) DropForwardedSteps(&out);
  if (updating_) {
    queued_.push_back(std::move(p));
    return out;
  }
  if (!TryProcess(p, &out)) {
    auto key = std::make_pair(p.worker, p.seq);
    auto waiting = parked_.find(key);
    if (waiting != parked_.end() && waiting->second.reply.conn != p.reply.conn) {
      // The same push through another connection: the worker sent it again after the server
      // that forwarded the waiting copy was replaced (replication). The waiting copy is applied
      // once, and answered to the worker.
      waiting->second.reply = std::move(p.reply);
      out.duplicates++;
      out.release.push_back(p.buffer);
    } else if (waiting != parked_.end()) {
      out.acks.push_back({p.reply,
                          Status::AlreadyExists(fmt::format(
                              "push of step {} by worker {} is already waiting", p.seq, p.worker)),
                          version()});
      out.release.push_back(p.buffer);
    } else {
      out.parked_buffers_delta += p.holds_buffer();
      parked_.emplace(key, std::move(p));
    }
  }
  Drain(&out);
  return out;
}

EngineActions ChunkEngine::OnConnectionClosed(const transport::Connection* owner) {
  EngineActions out;
  for (auto it = parked_.begin(); it != parked_.end();) {
    if (it->second.reply.conn.get() == owner) {
      out.release.push_back(it->second.buffer);
      out.parked_buffers_delta -= it->second.holds_buffer();
      it = parked_.erase(it);
    } else {
      ++it;
    }
  }
  for (auto it = queued_.begin(); it != queued_.end();) {
    if (it->reply.conn.get() == owner) {
      out.release.push_back(it->buffer);
      it = queued_.erase(it);
    } else {
      ++it;
    }
  }
  {
    std::lock_guard<std::mutex> lock(grants_mu_);
    std::erase_if(grants_, [&](const ParkedGrant& g) { return g.owner == owner; });
  }
  if (cfg_.mode == Mode::kSsp && owner != nullptr) {
    // Its worker left: the others no longer wait for its clock.
    bool changed = false;
    for (uint32_t w = 0; w < cfg_.num_workers; ++w) {
      if (conn_of_[w] == owner && !departed_[w]) {
        departed_[w] = true;
        changed = true;
      }
    }
    if (changed) {
      UpdateSlowest();
      Drain(&out);
    }
  }
  return out;
}

EngineActions ChunkEngine::RemoveWorker(uint32_t worker) {
  EngineActions out;
  if (worker >= cfg_.num_workers || removed_[worker]) return out;
  removed_[worker] = true;
  departed_[worker] = true;
  --live_workers_;
  join_from_[worker] = 0;
  std::erase(joiners_, worker);
  if (cfg_.mode == Mode::kSync) {
    // The others publish each step from now on; a step that already has their pushes goes now.
    // Its pushes in open steps stay (folded in), and those steps wait for the others still.
    quorum_ = std::max<uint32_t>(1, std::min(quorum_, live_workers_));
    backups_ = true;
    for (auto& [seq, step] : steps_)
      if (std::find(step.pushers.begin(), step.pushers.end(), worker) != step.pushers.end())
        step.removed_pushes++;
  }
  if (cfg_.mode == Mode::kSsp) UpdateSlowest();
  // What it left parked or queued is refused now: a push of the worker after it rejoins is of
  // its new process, and must not find an old one in line before it.
  const Status refused = Status::Aborted(fmt::format(
      "worker {} was removed from the job (declared dead): its pushes are refused", worker));
  for (auto it = parked_.begin(); it != parked_.end();) {
    if (it->first.first != worker) {
      ++it;
      continue;
    }
    out.acks.push_back({std::move(it->second.reply), refused, version()});
    out.release.push_back(it->second.buffer);
    out.parked_buffers_delta -= it->second.holds_buffer();
    it = parked_.erase(it);
  }
  for (auto it = queued_.begin(); it != queued_.end();) {
    if (it->worker != worker) {
      ++it;
      continue;
    }
    out.acks.push_back({std::move(it->reply), refused, version()});
    out.release.push_back(it->buffer);
    it = queued_.erase(it);
  }
  Drain(&out);
  return out;
}

EngineActions ChunkEngine::RestoreWorker(uint32_t worker, uint64_t* next_seq) {
  EngineActions out;
  *next_seq = 0;
  if (worker >= cfg_.num_workers || !removed_[worker]) return out;
  removed_[worker] = false;
  conn_of_[worker] = nullptr;
  ++live_workers_;
  uint64_t& last = last_seq_[worker];
  switch (cfg_.mode) {
    case Mode::kSync:
      // Every step not published yet waits for it again; its pushes folded into open steps
      // count as a live worker's again.
      quorum_ = std::min(configured_quorum_, live_workers_);
      for (auto& [seq, step] : steps_)
        if (std::find(step.pushers.begin(), step.pushers.end(), worker) != step.pushers.end())
          step.removed_pushes--;
      last = std::max(last, version());
      join_from_[worker] = last + 1;
      if (std::find(joiners_.begin(), joiners_.end(), worker) == joiners_.end())
        joiners_.push_back(worker);
      break;
    case Mode::kSsp: {
      // Its clock starts at the slowest live worker's (it left: departed_ is set, so that is
      // the others').
      const uint64_t slowest = slowest_.load(std::memory_order_relaxed);
      if (slowest < (uint64_t{1} << 62)) last = std::max(last, slowest);
      break;
    }
    case Mode::kAsync:
      break;
  }
  // ssp: it holds nobody back until its first push (it is still `departed_`), which then starts
  // its clock where the others are.
  *next_seq = last + 1;
  Drain(&out);
  return out;
}

EngineActions ChunkEngine::JoinAt(uint32_t worker, uint64_t from, uint64_t* next_seq) {
  EngineActions out;
  *next_seq = 0;
  if (worker >= cfg_.num_workers || removed_[worker]) return out;
  uint64_t& last = last_seq_[worker];
  const uint64_t at = std::max(from, last + 1);
  last = at - 1;
  if (cfg_.mode == Mode::kSync) {
    join_from_[worker] = at;
    if (std::find(joiners_.begin(), joiners_.end(), worker) == joiners_.end())
      joiners_.push_back(worker);
  }
  *next_seq = at;
  Drain(&out);
  return out;
}

uint32_t ChunkEngine::Needed(uint64_t t, const Step& st) const {
  uint32_t skip = 0;
  for (uint32_t w : joiners_)
    if (join_from_[w] > t && std::find(st.pushers.begin(), st.pushers.end(), w) == st.pushers.end())
      ++skip;
  const uint32_t live = live_workers_ > skip ? live_workers_ - skip : 1;
  return std::min(quorum_, live) + st.removed_pushes;
}

std::vector<uint32_t> ChunkEngine::removed_workers() const {
  std::vector<uint32_t> out;
  for (uint32_t w = 0; w < cfg_.num_workers; ++w)
    if (removed_[w]) out.push_back(w);
  return out;
}

bool ChunkEngine::TryProcess(LandedPush& p, EngineActions* out) {
  auto refuse = [&](Status st) {
    out->acks.push_back({p.reply, std::move(st), version()});
    out->release.push_back(p.buffer);
    return true;
  };
  if (!failure_.ok()) return refuse(failure_);
  if (p.worker >= cfg_.num_workers)
    return refuse(Status::InvalidArgument(fmt::format("unknown worker {}", p.worker)));
  if (removed_[p.worker])
    return refuse(Status::Aborted(fmt::format(
        "worker {} was removed from the job (declared dead): its pushes are refused", p.worker)));
  if (Status st = rule_->Check(p.grad); !st.ok()) return refuse(st);
  uint64_t last = last_seq_[p.worker];
  if (p.reply.conn) conn_of_[p.worker] = p.reply.conn.get();
  if (departed_[p.worker] && cfg_.mode == Mode::kSsp) {
    // It pushes again (its pushes came through a primary that was replaced, or it came back):
    // its clock holds the others back again.
    departed_[p.worker] = false;
    UpdateSlowest();
  }
  if (p.seq <= last) {
    // A resent push: acknowledged, never applied twice. In sync mode a resend of a step that is
    // not published yet is answered when it is.
    Take(p);
    out->duplicates++;
    out->release.push_back(p.buffer);
    auto pending = steps_.find(p.seq);
    if (cfg_.mode == Mode::kSync && pending != steps_.end()) {
      pending->second.acks.push_back({p.reply, false});
    } else {
      out->acks.push_back({p.reply, Status::OK(), version()});
    }
    return true;
  }
  // Its predecessor is not applied yet; with backup workers, a worker that was late skips the
  // steps that were published without it.
  if (p.seq != last + 1 && !SkipsPublished(p.seq)) return false;
  if (backups_ && p.seq <= version()) {
    Take(p);
    DropLate(p, out);
    return true;
  }
  if (HeldBack(p)) {  // too far ahead of the step, or of the slowest (ssp)
    if (WorkerCounters* c = Counters(p.worker)) c->waits.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  if (HeldForCopy(p)) return false;  // parked until ReleaseHold
  Take(p);
  if (cfg_.mode == Mode::kSync) {
    ProcessSync(p, out);
  } else {
    ProcessAsync(p, out);
  }
  return true;
}

EngineActions ChunkEngine::ReleaseHold() {
  EngineActions out;
  hold_new_steps_.store(false, std::memory_order_release);
  Drain(&out);
  return out;
}

void ChunkEngine::ProcessAsync(LandedPush& p, EngineActions* out) {
  uint64_t lead = 0;
  for (uint32_t w = 0; w < cfg_.num_workers; ++w)
    if (!departed_[w]) lead = std::max(lead, last_seq_[w]);
  const uint64_t behind = lead > last_seq_[p.worker] ? lead - last_seq_[p.worker] : 0;
  uint64_t staleness = 0;
  p.grad.weight = WeightOf(p, &staleness);
  CountApplied(p, staleness, behind);
  last_seq_[p.worker] = p.seq;
  if (cfg_.mode == Mode::kSsp) UpdateSlowest();
  out->applied++;
  Update(
      p.grad, nullptr, 1.0f, p.lr,
      [this, reply = std::move(p.reply), buffer = p.buffer, hold = p.hold](EngineActions* o) {
        o->release.push_back(buffer);
        o->acks.push_back({reply, failure_, version()});
      },
      out);
}

void ChunkEngine::ProcessSync(LandedPush& p, EngineActions* out) {
  uint64_t seq = p.seq;
  auto open = steps_.find(seq);
  if (open != steps_.end() && open->second.count >= Needed(seq, open->second))
    return DropLate(p, out);
  last_seq_[p.worker] = p.seq;
  out->applied++;
  uint64_t staleness = 0;
  p.grad.weight = WeightOf(p, &staleness);
  CountApplied(p, staleness, 0);
  Step& step = steps_[seq];
  step.acks.push_back({std::move(p.reply), false});
  step.pushers.push_back(p.worker);
  if (p.worker < step.lr_from) {
    step.lr_from = p.worker;
    step.lr = p.lr;
  }
  bool next_in_line = seq == version() + 1;
  if (step.count + 1 == Needed(seq, step) && next_in_line && !cfg_.forward_steps) {
    // The step's last push is folded straight into the update (no accumulator pass): it is
    // the gradient (decoded as the update goes, when compressed) and the others' sum the extra.
    GradientView sum = SumView(step.sum);
    bool has_sum = step.count > 0;
    Update(
        p.grad, has_sum ? &sum : nullptr, Scale(step.count + 1), step.lr,
        [this, seq, buffer = p.buffer, hold = p.hold](EngineActions* o) {
          o->release.push_back(buffer);
          auto it = steps_.find(seq);
          for (auto& a : it->second.acks) o->acks.push_back({a.to, failure_, version(), a.late});
          if (it->second.own) spare_.push_back(std::move(it->second.own));
          steps_.erase(it);
        },
        out);
    return;
  }
  if (step.count == 0) {
    if (next_in_line && !slots_.master && !rule_->owns_parameters() && !cfg_.forward_steps) {
      // The next slot is free while this step is next in line: sum there (no model-sized
      // accumulator in sync mode). It no longer holds a valid version.
      uint8_t* slot = Slot(version() + 1);
      Stamp(slot, 0);
      std::atomic_thread_fence(std::memory_order_seq_cst);
      step.sum = reinterpret_cast<float*>(slot);
    } else {
      if (!spare_.empty()) {
        step.own = std::move(spare_.back());
        spare_.pop_back();
      } else if (cfg_.spare_sum) {
        step.own = cfg_.spare_sum();
      }
      if (!step.own) {
        step.own = rule_->NewAccumulator();
        out->sums_allocated++;
      }
      step.sum = step.own->data();
    }
    rule_->Fold(step.sum, p.grad, true);
  } else {
    rule_->Fold(step.sum, p.grad, false);
  }
  step.count++;
  out->release.push_back(p.buffer);
}

void ChunkEngine::PublishReadySteps(EngineActions* out) {
  auto it = steps_.find(version() + 1);
  // Rejoined workers whose first step is past: no step skips them any more.
  std::erase_if(joiners_, [&](uint32_t w) { return join_from_[w] <= version() + 1; });
  if (it == steps_.end() || it->second.count < Needed(it->first, it->second)) return;
  uint64_t seq = it->first;
  const float scale = Scale(it->second.count);
  Update(
      SumView(it->second.sum), nullptr, scale, it->second.lr,
      [this, seq, scale](EngineActions* o) {
        auto s = steps_.find(seq);
        if (cfg_.forward_steps && failure_.ok()) {
          // The sum goes to the backup with the acknowledgements (a new accumulator for a
          // later step).
          EngineActions::Step& f = o->steps.emplace_back();
          f.seq = seq;
          f.pushers = s->second.pushers;
          f.lr = s->second.lr;
          f.scale = scale;
          f.sum = std::move(s->second.own);
          for (auto& a : s->second.acks) f.acks.push_back({a.to, failure_, version(), a.late});
        } else {
          for (auto& a : s->second.acks) o->acks.push_back({a.to, failure_, version(), a.late});
          if (s->second.own) spare_.push_back(std::move(s->second.own));
        }
        steps_.erase(s);
      },
      out);
}

void ChunkEngine::Drain(EngineActions* out) {
  for (;;) {
    if (updating_) return;  // resumed when the update completes
    uint64_t before = version();
    ApplyForwardedSteps(out);
    if (updating_ || version() != before) continue;
    size_t parked_before = parked_.size(), queued_before = queued_.size();
    if (cfg_.mode == Mode::kSync) PublishReadySteps(out);
    if (updating_ || version() != before) continue;
    // The parked push that is next in line for its worker, if it may go now.
    for (uint32_t w = 0; w < cfg_.num_workers && !updating_; ++w) {
      auto it = parked_.lower_bound({w, last_seq_[w] + 1});
      if (it == parked_.end() || it->first.first != w) continue;
      const uint64_t seq = it->first.second;
      const bool skips = SkipsPublished(seq);
      if (seq != last_seq_[w] + 1 && !skips) continue;
      if (!skips && (HeldBack(it->second) || HeldForCopy(it->second))) continue;
      LandedPush p = std::move(it->second);
      parked_.erase(it);
      out->parked_buffers_delta -= p.holds_buffer();
      if (!TryProcess(p, out)) {  // not expected (next in line and admissible): parked again
        out->parked_buffers_delta += p.holds_buffer();
        parked_.emplace(std::make_pair(p.worker, p.seq), std::move(p));
        continue;  // the other workers' pushes may go
      }
    }
    if (!updating_ && !queued_.empty()) {
      LandedPush p = std::move(queued_.front());
      queued_.pop_front();
      if (!TryProcess(p, out)) {
        auto key = std::make_pair(p.worker, p.seq);
        if (!parked_.count(key)) {
          out->parked_buffers_delta += p.holds_buffer();
          parked_.emplace(key, std::move(p));
        } else {
          out->acks.push_back(
              {p.reply, Status::AlreadyExists("push is already waiting"), version()});
          out->release.push_back(p.buffer);
        }
      }
    }
    if (version() == before && parked_.size() == parked_before && queued_.size() == queued_before &&
        !updating_)
      break;
  }
  AdmitGrants(out);
}

EngineActions ChunkEngine::OnForwardedStep(ForwardedStep f) {
  EngineActions out;
  auto refuse = [&](Status st) {
    out.acks.push_back({std::move(f.reply), std::move(st), version()});
  };
  if (!failure_.ok()) {
    refuse(failure_);
    return out;
  }
  if (f.seq <= version()) {  // sent again after the link was reopened: applied once
    out.duplicates += f.pushers.size();
    out.acks.push_back({std::move(f.reply), Status::OK(), version()});
    return out;
  }
  if (!steps_.empty() || !parked_.empty()) {
    refuse(Status::Aborted(fmt::format(
        "step {} of the primary arrives while this copy takes pushes itself (version {})", f.seq,
        version())));
    return out;
  }
  auto waiting = forwarded_.find(f.seq);
  if (waiting != forwarded_.end()) {
    // Sent again while the first copy waits: the newer answer address takes over.
    out.duplicates += f.pushers.size();
    out.acks.push_back({std::move(waiting->second.reply), Status::OK(), version()});
    waiting->second.reply = std::move(f.reply);
  } else if (forwarded_.size() >= kMaxStepsAhead) {
    refuse(Status::ResourceExhausted(
        fmt::format("step {} arrives with {} steps of the primary waiting for step {}", f.seq,
                    forwarded_.size(), version() + 1)));
    return out;
  } else {
    const uint64_t seq = f.seq;
    forwarded_.emplace(seq, std::move(f));
  }
  ApplyForwardedSteps(&out);
  Drain(&out);
  return out;
}

void ChunkEngine::ApplyForwardedSteps(EngineActions* out) {
  while (!updating_ && !forwarded_.empty()) {
    auto it = forwarded_.begin();
    if (it->first > version() + 1) return;
    ForwardedStep f = std::move(it->second);
    forwarded_.erase(it);
    if (f.seq <= version()) {
      out->duplicates += f.pushers.size();
      out->acks.push_back({std::move(f.reply), Status::OK(), version()});
      continue;
    }
    for (uint32_t w : f.pushers) {
      if (w >= cfg_.num_workers) continue;
      last_seq_[w] = std::max(last_seq_[w], f.seq);
      if (WorkerCounters* c = Counters(w)) c->pushes.fetch_add(1, std::memory_order_relaxed);
    }
    out->applied += f.pushers.size();
    std::erase_if(joiners_, [&](uint32_t w) { return join_from_[w] <= f.seq; });
    GradientView sum = SumView(f.sum);
    sum.memory = transport::MemoryKind::kHost;  // as it arrived, whatever the rule's memory
    Update(
        sum, nullptr, f.scale, f.lr,
        [this, reply = std::move(f.reply), hold = std::move(f.hold)](EngineActions* o) {
          o->acks.push_back({reply, failure_, version()});
        },
        out);
  }
}

void ChunkEngine::DropForwardedSteps(EngineActions* out) {
  for (auto& [seq, f] : forwarded_)
    out->acks.push_back(
        {std::move(f.reply),
         Status::Aborted(fmt::format("step {} of the primary came after this copy took pushes "
                                     "itself (version {})",
                                     seq, version())),
         version()});
  forwarded_.clear();
}

void ChunkEngine::Update(const GradientView& grad, const GradientView* extra, float scale,
                         std::optional<float> lr, std::function<void(EngineActions*)> then,
                         EngineActions* out) {
  uint64_t v = version();
  uint8_t* next = Slot(v + 1);
  // Seqlock: the slot's tag is zeroed before any of its bytes changes and set to the new
  // version after the last, so a reader that finds its tag unchanged across its read got one
  // whole version (docs/protocol.md, "Published slots").
  Stamp(next, 0);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  updating_ = true;
  after_update_ = std::move(then);
  // Plain slots: version v+1 is computed from slot v into slot v+1. Encoded slots: the fp32
  // master is updated in place and published encoded into slot v+1.
  // A rule that owns the parameters (the device rule) publishes into slot v+1 itself.
  const bool owns = rule_->owns_parameters();
  const auto* in = slots_.master ? slots_.master : reinterpret_cast<const float*>(Slot(v));
  auto* dst = slots_.master ? slots_.master : reinterpret_cast<float*>(next);
  if (owns) in = dst = nullptr;
  Publish publish{next, slots_.publish};
  auto caller = std::this_thread::get_id();
  auto inline_done = std::make_shared<std::atomic<bool>>(false);
  auto in_apply = std::make_shared<std::atomic<bool>>(true);
  rule_->Apply(in, dst, grad, extra, scale, lr, slots_.master || owns ? &publish : nullptr,
               [this, out, caller, inline_done, in_apply](Status st) {
                 if (in_apply->load() && std::this_thread::get_id() == caller) {
                   inline_done->store(true);
                   OnUpdateDone(std::move(st), out);
                   return;
                 }
                 // Completed later (a device rule): finish on the owner thread and hand the actions
                 // over.
                 auto finish = [this, st = std::move(st)]() mutable {
                   EngineActions a;
                   OnUpdateDone(std::move(st), &a);
                   Drain(&a);
                   if (later_) later_(std::move(a));
                 };
                 if (to_owner_) {
                   to_owner_(std::move(finish));
                 } else {
                   finish();
                 }
               });
  in_apply->store(false);
}

void ChunkEngine::OnUpdateDone(Status st, EngineActions* out) {
  updating_ = false;
  if (st.ok()) {
    uint64_t v = version() + 1;
    Stamp(Slot(v), v + 1);
    version_.store(v, std::memory_order_release);
    out->published++;
  } else if (failure_.ok()) {
    // The new version was not computed: the chunk refuses everything from now on (the
    // published version stays readable).
    failure_ = st.WithContext("update failed");
  }
  auto then = std::move(after_update_);
  after_update_ = nullptr;
  if (then) then(out);
}

float ChunkEngine::Scale(uint32_t contributors) const {
  // The mean is over the contributors of the step: its pushes (the quorum's, or more when a
  // worker removed after it pushed was counted in), or the workers whose sums the nodes pushed.
  const uint32_t over = cfg_.mean_over ? cfg_.mean_over : std::max<uint32_t>(1, contributors);
  return cfg_.aggregate == Aggregate::kMean ? 1.0f / static_cast<float>(over) : 1.0f;
}

void ChunkEngine::Stamp(uint8_t* slot, uint64_t tag) {
  reinterpret_cast<std::atomic<uint64_t>*>(slot + slots_.layout.trailer_offset)
      ->store(tag, std::memory_order_release);
}

GradientView ChunkEngine::SumView(const float* sum) const {
  GradientView g;
  g.data = sum;
  g.memory = rule_->memory();
  g.numel = rule_->numel();
  g.bytes = g.numel * sizeof(float);
  return g;
}

}  // namespace shardps::server
