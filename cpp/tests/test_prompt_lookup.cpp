// neuralink-run's drafts: what prompt lookup proposes, what a verification keeps, when the gate opens.

#include "neuralink/prompt_lookup.h"
#include "test_util.h"

using neuralink::confirmed_prefix;
using neuralink::DraftGate;
using neuralink::kDraftRetrial;
using neuralink::kDraftTrialShare;
using neuralink::prompt_lookup;
using neuralink::StallShare;
using Tokens = std::vector<int32_t>;

TEST(prompt_lookup_continues_the_most_recent_earlier_bigram) {
    // "7 8" occurs twice before the end: the later occurrence (followed by 5 6) is the one continued
    const Tokens text = { 7, 8, 1, 2, 3, 7, 8, 5, 6, 4, 7, 8 };
    CHECK(prompt_lookup(text, 2) == (Tokens { 5, 6 }));
    CHECK(prompt_lookup(text, 10) == (Tokens { 5, 6, 4, 7, 8 })); // up to the end of the text, not past it
}

TEST(prompt_lookup_falls_back_to_the_last_token_then_to_nothing) {
    CHECK(prompt_lookup({ 3, 9, 4, 5, 1, 9 }, 3) == (Tokens { 4, 5, 1 })); // "1 9" never occurred, "9" did
    CHECK(prompt_lookup({ 1, 2, 3, 4 }, 4).empty());                       // nothing repeats
    CHECK(prompt_lookup({ 5, 5 }, 4) == (Tokens { 5 }));                   // one earlier "5", followed by the last
    CHECK(prompt_lookup({ 5 }, 4).empty());
    CHECK(prompt_lookup({}, 4).empty());
    CHECK(prompt_lookup({ 7, 8, 9, 7, 8 }, 0).empty()); // no room for proposals
}

TEST(a_verification_keeps_the_proposals_the_greedy_choices_confirm) {
    // greedy[j] follows the fed token and draft[0..j): draft[j] stands while it equals greedy[j]
    CHECK(confirmed_prefix({ 4, 5, 6 }, { 4, 5, 9, 2 }) == 2);
    CHECK(confirmed_prefix({ 4, 5, 6 }, { 4, 5, 6, 2 }) == 3);
    CHECK(confirmed_prefix({ 4, 5, 6 }, { 1, 5, 6, 2 }) == 0); // a later match after a miss does not count
    CHECK(confirmed_prefix({}, { 3 }) == 0);
}

TEST(the_stall_share_is_a_moving_average_of_single_tokens) {
    StallShare share;
    CHECK(!share.measured() && !share.at_least(0.0)); // shut until a token was measured
    share.observe(0.8, 1.0);
    CHECK_NEAR(share.value(), 0.8, 1e-12);
    CHECK(share.at_least(0.55));
    share.observe(0.0, 1.0); // one fast token moves it a quarter of the way
    CHECK_NEAR(share.value(), 0.6, 1e-12);
    share.observe(0.0, 1.0);
    CHECK_NEAR(share.value(), 0.45, 1e-12);
    CHECK(!share.at_least(0.55));
}

TEST(drafts_are_tried_only_where_the_reads_take_a_share_of_a_token) {
    DraftGate gate;
    CHECK(!gate.draft()); // nothing decoded yet: no verification on a guess
    gate.observe_single(0.2, 1.0); // the reads hide too little of a verification's arithmetic
    CHECK(!gate.draft());
    gate.observe_single(1.0, 1.0); // share 0.4: a verification is tried, to be measured
    CHECK(gate.stall().value() >= kDraftTrialShare);
    CHECK(gate.draft());
}

// `opportunities` lookups that found proposals, each verified (pass_seconds, produced) or decoded as a single
// token (single_stall, single_seconds) as the gate says; returns how many were verified
static unsigned decode(DraftGate & gate, unsigned opportunities, double pass_seconds, size_t produced,
                       double single_stall = 0.6, double single_seconds = 1.0) {
    unsigned verified = 0;
    for (unsigned i = 0; i < opportunities; ++i) {
        if (gate.draft()) {
            gate.observe_verification(pass_seconds, produced);
            ++verified;
        } else {
            gate.observe_single(single_stall, single_seconds);
        }
    }
    return verified;
}

TEST(drafts_are_made_while_they_give_tokens_faster_than_single_decodes) {
    DraftGate gate;
    gate.observe_single(0.6, 1.0);     // a token in a second, 60 % of it waiting for reads
    gate.observe_verification(1.2, 2); // a pass costs 1.2 s; 2 tokens a pass (the prior's too): 0.6 s a token
    CHECK_NEAR(gate.drafted_seconds(), 0.6, 1e-12);
    // ahead: a single token only where none came for kDraftRetrial opportunities, to keep it measured
    CHECK(decode(gate, 2 * kDraftRetrial, 1.2, 2) == 2 * kDraftRetrial - 2);
    gate.observe_single(0.6, 1.0); // a lookup that found nothing: a single token anyway
    CHECK(decode(gate, kDraftRetrial - 1, 1.2, 2) == kDraftRetrial - 1);

    DraftGate losing;
    losing.observe_single(0.6, 1.0);
    losing.observe_verification(3.0, 2); // 1.5 s a token: behind
    CHECK(decode(losing, 2 * kDraftRetrial, 3.0, 2) == 2); // retried once in kDraftRetrial, to notice a change
    // the reads no longer take most of a token: not even retried
    CHECK(decode(losing, 2 * kDraftRetrial, 3.0, 2, 0.0, 1.0) <= 1); // (one retrial before the share fell)
    CHECK(!losing.stall().at_least(kDraftTrialShare));
    CHECK(decode(losing, 2 * kDraftRetrial, 3.0, 2, 0.0, 1.0) == 0);
}

TEST(one_unlucky_verification_does_not_shut_the_drafts) {
    // confirmations come in bursts: the tokens a pass produces are averaged with a long memory, from a prior of 2
    DraftGate gate;
    gate.observe_single(0.7, 1.0);
    gate.observe_verification(1.2, 4);
    gate.observe_verification(1.2, 4);
    gate.observe_verification(1.2, 1); // nothing confirmed: 1.2 s for one token, yet ~2.3 tokens a pass
    CHECK_NEAR(gate.produced_per_pass(), ((2.0 * 0.875 + 0.5) * 0.875 + 0.5) * 0.875 + 0.125, 1e-12);
    CHECK(gate.drafted_seconds() < 1.0);
    CHECK(gate.draft());
    for (int i = 0; i < 16; ++i) {
        gate.observe_verification(1.2, 1); // but a text where proposals are never confirmed shuts them
    }
    CHECK(gate.drafted_seconds() > 1.0);
    CHECK(!gate.draft());
    gate.observe_verification(0.5, 0); // a pass that produced nothing (cannot happen) is ignored
    CHECK_NEAR(gate.pass_seconds().value(), 1.2, 1e-9);
}
