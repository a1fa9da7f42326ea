#!/usr/bin/perl
# The independent DKIM verifier of the tests: Perl's Mail::DKIM (SpamAssassin's), keys
# from the loopback DNS server (tests/dnsserver.py) at 127.0.0.1:PORT.
# Reads one message (CRLF lines, as a relay received it) on stdin; prints one line per
# signature: "RESULT DOMAIN SELECTOR ALGORITHM DETAIL", then "overall RESULT".
use strict;
use warnings;
use Mail::DKIM::Verifier;
use Mail::DKIM::DNS;
use Net::DNS::Resolver;

my $port = shift @ARGV or die "usage: dkimverify.pl DNS_PORT < message\n";
my $resolver = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port,
                                       recurse => 1, retry => 2, udp_timeout => 5,
                                       tcp_timeout => 5);
Mail::DKIM::DNS::resolver($resolver);
binmode STDIN;
my $message = do { local $/; <STDIN> };
my $dkim = Mail::DKIM::Verifier->new();
$dkim->PRINT($message);
$dkim->CLOSE();
foreach my $sig ($dkim->signatures) {
    my $detail = $sig->result_detail;
    $detail =~ s/\s+/_/g;
    print join(" ", $sig->result, $sig->domain, $sig->selector, $sig->algorithm, $detail), "\n";
}
print "overall ", $dkim->result, "\n";
