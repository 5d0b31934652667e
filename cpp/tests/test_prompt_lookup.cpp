// neuralink-run's drafts: what prompt lookup proposes, what a verification keeps, when the gate opens.

#include "neuralink/prompt_lookup.h"
#include "test_util.h"

using neuralink::confirmed_prefix;
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
